"""Character-level RNN language model with a stacked fr.LSTM: perplexity and sampled text.

The char-RNN setting (Karpathy 2015; the WildML RNN tutorial; cs224n): a text becomes character
ids c_0 ... c_(N−1) (vocabulary: its distinct characters), cut into windows of --length steps;
the model reads c_t and predicts c_(t+1) at every step,

    p(c_(t+1) | c_≤t) = softmax(W_o h_t + b_o),  h_t the top layer's state,

trained with the mean cross-entropy; the per-character perplexity is exp of it. Baselines: a
uniform guess scores |V|, the unigram frequencies exp(H_unigram).

Model: Embedding -> fr.StackedRNN([fr.LSTM(units, return_sequences=True)] * layers) ->
Dense(|V|), fr.ClippingOptimizer(Adam(lr), global norm --clip_threshold), an
fr.GradientNormMonitor recording ‖∂ℓ/∂h_t‖ of every LSTM layer on a validation batch, and
optionally truncated BPTT (--bptt_truncate, the WildML tutorial's bptt_truncate).

Text, in order of preference: --text_file (any local UTF-8 file; its last tenth is the
validation text); TFDS tiny_shakespeare when it is already prepared in the TFDS data directory
(or --download and the network allows it); else a small built-in text (public-domain
Shakespeare, ~5 KB). The network is never required.

    python examples/char_rnn.py --out /tmp/char_rnn [--text_file input.txt]

writes results.md, results.json (losses, perplexities, baselines), samples.txt, grad_norms.png
and grad_norms.csv (the monitor) and tensorboard/ to --out. The defaults (2 × 128 LSTM units,
dropout 0.3 between them, 200 steps) run in about 20 s on a 2-core CPU; on the ~5 KB built-in
text the validation perplexity bottoms out near 11 (unigram: 22, uniform: 55) and the model
starts to memorise after ~200 steps: give it a larger --text_file (and more --steps) for real
results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import _cli

_cli.quiet_startup()  # before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_fancyrnn as fr  # noqa: E402
from keras_fancyrnn import datasets as frd  # noqa: E402
from keras_fancyrnn._tf import tf  # noqa: E402
from keras_fancyrnn.diagnostics import json_safe, ratio_first_last  # noqa: E402

CELLS = {"lstm": fr.LSTM, "gru": fr.GRU, "simple_rnn": fr.SimpleRNN}

#: Public-domain Shakespeare (Sonnets 18, 29, 30, 55, 60, 73, 116, 130; Hamlet III.1), the
#: fallback corpus when no text file is given and tiny_shakespeare is not available offline.
BUILTIN_TEXT = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.

When to the sessions of sweet silent thought
I summon up remembrance of things past,
I sigh the lack of many a thing I sought,
And with old woes new wail my dear time's waste:
Then can I drown an eye, unused to flow,
For precious friends hid in death's dateless night,
And weep afresh love's long since cancell'd woe,
And moan the expense of many a vanish'd sight:
Then can I grieve at grievances foregone,
And heavily from woe to woe tell o'er
The sad account of fore-bemoaned moan,
Which I new pay as if not paid before.
But if the while I think on thee, dear friend,
All losses are restored and sorrows end.

Not marble, nor the gilded monuments
Of princes, shall outlive this powerful rhyme;
But you shall shine more bright in these contents
Than unswept stone, besmear'd with sluttish time.
When wasteful war shall statues overturn,
And broils root out the work of masonry,
Nor Mars his sword nor war's quick fire shall burn
The living record of your memory.
'Gainst death and all-oblivious enmity
Shall you pace forth; your praise shall still find room
Even in the eyes of all posterity
That wear this world out to the ending doom.
So, till the judgment that yourself arise,
You live in this, and dwell in lovers' eyes.

Like as the waves make towards the pebbled shore,
So do our minutes hasten to their end;
Each changing place with that which goes before,
In sequent toil all forwards do contend.
Nativity, once in the main of light,
Crawls to maturity, wherewith being crown'd,
Crooked eclipses 'gainst his glory fight,
And Time that gave doth now his gift confound.
Time doth transfix the flourish set on youth
And delves the parallels in beauty's brow,
Feeds on the rarities of nature's truth,
And nothing stands but for his scythe to mow:
And yet to times in hope my verse shall stand,
Praising thy worth, despite his cruel hand.

That time of year thou mayst in me behold
When yellow leaves, or none, or few, do hang
Upon those boughs which shake against the cold,
Bare ruin'd choirs, where late the sweet birds sang.
In me thou see'st the twilight of such day
As after sunset fadeth in the west,
Which by and by black night doth take away,
Death's second self, that seals up all in rest.
In me thou see'st the glowing of such fire
That on the ashes of his youth doth lie,
As the death-bed whereon it must expire,
Consumed with that which it was nourish'd by.
This thou perceivest, which makes thy love more strong,
To love that well which thou must leave ere long.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come:
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.

My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
And yet, by heaven, I think my love as rare
As any she belied with false compare.

To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.
"""


@dataclasses.dataclass
class Config:
    """One run (the flags of the same names)."""

    out: str = "char_rnn_out"
    text_file: str | None = None
    download: bool = False
    data_dir: str | None = None
    cell: str = "lstm"
    layers: int = 2
    units: int = 128
    embedding_dim: int = 32
    dropout: float = 0.3
    bptt_truncate: int | None = None
    length: int = 64
    batch_size: int = 32
    steps: int = 200
    eval_every: int = 50
    learning_rate: float = 0.005
    clip_threshold: float = 5.0
    record_every: int = 50
    sample_length: int = 300
    temperature: float = 0.7
    seed: int = 0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {list(CELLS)}, got {self.cell!r}")
        for name in ("layers", "units", "embedding_dim", "length", "batch_size", "steps",
                     "eval_every", "record_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.steps % self.eval_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every "
                             f"({self.eval_every})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_text(config: Config) -> dict[str, Any]:
    """``{"source", "train", "validation", "vocabulary", "train_ids"}``: the two ``tf.data``
    pipelines of ``(inputs, targets)`` id windows and the character vocabulary.

    The last batch of a pass may be smaller (``drop_remainder=False``), so a short text with
    fewer windows than ``batch_size`` still trains.
    """
    if config.text_file:
        text = frd.read_text(os.fspath(config.text_file))
        return _split_text(text, f"file {config.text_file}", config)
    try:
        train, vocab = frd.tiny_shakespeare(config.length, config.batch_size, "train",
                                            data_dir=config.data_dir, download=config.download,
                                            seed=config.seed, drop_remainder=False)
        val, _ = frd.tiny_shakespeare(config.length, config.batch_size, "validation",
                                      data_dir=config.data_dir, download=False, shuffle=False,
                                      drop_remainder=False)
    except frd.DatasetUnavailableError as err:
        print(f"tiny_shakespeare not available ({str(err).split('.')[0]}); using the built-in "
              "text")
        return _split_text(BUILTIN_TEXT, "built-in text (Shakespeare, public domain)", config)
    ids = np.concatenate([x.numpy().reshape(-1) for x, _ in train.take(20)])
    return {"source": "TFDS tiny_shakespeare", "train": train, "validation": val,
            "vocabulary": vocab, "train_ids": ids}


def _split_text(text: str, source: str, config: Config) -> dict[str, Any]:
    """The first 90 % of ``text`` for training, the rest for validation (one vocabulary)."""
    vocab = frd.CharVocabulary.from_text(text)
    cut = int(0.9 * len(text))
    train_text, val_text = text[:cut], text[cut:]
    if len(val_text) < config.length + 1:
        raise ValueError(
            f"the text ({len(text)} characters) is too short for length={config.length}: its "
            f"last 10 % ({len(val_text)} characters) must hold at least one validation window"
        )
    train, _ = frd.text_dataset(train_text, config.length, config.batch_size, vocabulary=vocab,
                                seed=config.seed, drop_remainder=False)
    val, _ = frd.text_dataset(val_text, config.length, config.batch_size, vocabulary=vocab,
                              shuffle=False, drop_remainder=False)
    return {"source": source, "train": train, "validation": val, "vocabulary": vocab,
            "train_ids": vocab.encode(train_text)}


def unigram_perplexity(ids: np.ndarray, vocab_size: int) -> float:
    """``exp`` of the entropy of the character frequencies: the unigram model's perplexity."""
    p = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------------------------
# Model, training, sampling
# ------------------------------------------------------------------------------------------------
def build_model(vocab_size: int, config: Config) -> keras.Model:
    keras.utils.set_random_seed(config.seed)
    cell = CELLS[config.cell]
    rnns = [cell(config.units, return_sequences=True, bptt_truncate=config.bptt_truncate,
                 name=f"{config.cell}_{i + 1}") for i in range(config.layers)]
    model = keras.Sequential(
        [keras.Input((None,), dtype="int32"),
         keras.layers.Embedding(vocab_size, config.embedding_dim, name="embedding"),
         fr.StackedRNN(rnns, dropout=config.dropout, seed=config.seed, name="stack"),
         keras.layers.Dense(vocab_size, name="logits")],
        name="char_rnn",
    )
    optimizer = fr.ClippingOptimizer(keras.optimizers.Adam(config.learning_rate),
                                     method="global_norm", threshold=config.clip_threshold)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class EvalLog(keras.callbacks.Callback):
    """Prints and keeps ``(step, train loss, validation loss, validation perplexity)``, with the
    evaluations done out of all and the time left."""

    def __init__(self, eval_every: int):
        super().__init__()
        self.eval_every = eval_every
        self.rows: list[dict[str, float]] = []

    def on_train_begin(self, logs=None):
        self.progress = _cli.Progress(self.params["epochs"])  # an epoch ends in an evaluation

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        val = float(logs.get("val_loss", math.nan))
        row = {"step": (epoch + 1) * self.eval_every, "train_loss": float(logs["loss"]),
               "val_loss": val, "val_perplexity": math.exp(val) if val < 50 else math.inf}
        self.rows.append(row)
        self.progress.finish(f"step {row['step']:5d}  train loss {row['train_loss']:.3f}  val "
                             f"loss {val:.3f}  val perplexity {row['val_perplexity']:.2f}")


def sample(model: keras.Model, vocabulary: frd.CharVocabulary, prime: np.ndarray, length: int,
           temperature: float, context: int, seed: int) -> str:
    """``length`` characters drawn one at a time from ``softmax(logits / temperature)``, each
    conditioned on the last ``context`` characters (the window length the model was trained
    on), starting from the ids ``prime``."""
    rng = np.random.default_rng(seed)

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def last_logits(window):
        return model(window, training=False)[0, -1]

    ids = list(np.asarray(prime, dtype=np.int32).reshape(-1))
    out = []
    for _ in range(length):
        window = np.asarray(ids[-context:], dtype=np.int32)[None]
        logits = last_logits(tf.constant(window)).numpy().astype(np.float64) / temperature
        p = np.exp(logits - logits.max())
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        ids.append(nxt)
        out.append(nxt)
    return vocabulary.decode(out)


def run(config: Config) -> dict[str, Any]:
    """Trains, evaluates, samples and writes everything to ``config.out``; returns the
    summary written to ``results.json``."""
    start = time.perf_counter()
    os.makedirs(config.out, exist_ok=True)
    data = load_text(config)
    vocab = data["vocabulary"]
    uniform, unigram = float(len(vocab)), unigram_perplexity(data["train_ids"], len(vocab))
    print(f"text: {data['source']}; vocabulary {len(vocab)} characters; baselines: uniform "
          f"perplexity {uniform:.1f}, unigram {unigram:.2f}")
    model = build_model(len(vocab), config)
    x_probe, y_probe = next(iter(data["validation"]))
    monitor = fr.GradientNormMonitor(
        (x_probe, y_probe), every_n_batches=config.record_every, input_norms=False,
        log_dir=os.path.join(config.out, "tensorboard"),
        csv_path=os.path.join(config.out, "grad_norms.csv"),
    )
    log = EvalLog(config.eval_every)
    initial = float(model.evaluate(data["validation"], verbose=0))
    print(f"  step     0  val loss {initial:.3f}  val perplexity {math.exp(initial):.2f}")
    train_start = time.perf_counter()
    model.fit(data["train"].repeat(), steps_per_epoch=config.eval_every,
              epochs=config.steps // config.eval_every, validation_data=data["validation"],
              shuffle=False, verbose=0, callbacks=[monitor, log])
    train_seconds = time.perf_counter() - train_start
    if monitor.steps[-1] != config.steps:
        monitor.record()
    monitor.plot(os.path.join(config.out, "grad_norms.png"))
    text = sample(model, vocab, x_probe.numpy()[0], config.sample_length, config.temperature,
                  config.length, config.seed)
    prime = vocab.decode(x_probe.numpy()[0])
    history = monitor.history
    stats = model.optimizer.stats()
    summary = {
        "config": dataclasses.asdict(config),
        "source": data["source"],
        "vocabulary_size": len(vocab),
        "uniform_perplexity": uniform,
        "unigram_perplexity": unigram,
        "initial_val_loss": initial,
        "evaluations": log.rows,
        "final_val_perplexity": log.rows[-1]["val_perplexity"],
        "best_val_perplexity": min(r["val_perplexity"] for r in log.rows),
        "grad_ratio_final": {k: ratio_first_last(v[-1]) for k, v in history.items()},
        "clip_rate": stats["clip_rate"],
        "skipped_steps": stats["skipped_steps"],
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "prime": prime,
        "sample": text,
    }
    write_outputs(summary, config.out)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    c = summary["config"]
    layer = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN"}[c["cell"]]
    lines = [
        f"# Char-RNN: {c['layers']} × fr.{layer}({c['units']}), {summary['source']}",
        "",
        f"Vocabulary {summary['vocabulary_size']} characters; length {c['length']}, batch "
        f"{c['batch_size']}, Adam lr {c['learning_rate']}, global-norm clipping at "
        f"{c['clip_threshold']} (clip rate {summary['clip_rate']:.2f}, "
        f"{summary['skipped_steps']} skipped steps), bptt_truncate {c['bptt_truncate']}. "
        f"Baselines: uniform perplexity {summary['uniform_perplexity']:.1f}, unigram "
        f"{summary['unigram_perplexity']:.2f}. Training {summary['train_seconds']} s.",
        "",
        "| step | train loss | val loss | val perplexity |",
        "|---:|---:|---:|---:|",
        f"| 0 | — | {summary['initial_val_loss']:.3f} | "
        f"{math.exp(summary['initial_val_loss']):.2f} |",
    ]
    for r in summary["evaluations"]:
        lines.append(f"| {r['step']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | "
                     f"{r['val_perplexity']:.2f} |")
    lines += [
        "",
        "‖∂ℓ/∂h_0‖ / ‖∂ℓ/∂h_T‖ at the end: "
        + ", ".join(f"{k} {v:.2e}" for k, v in summary["grad_ratio_final"].items()),
        "",
        "![gradient norms](grad_norms.png)",
        "",
        f"Sample (temperature {c['temperature']}), after the prime {summary['prime']!r}:",
        "",
        "```",
        summary["sample"],
        "```",
        "",
    ]
    return "\n".join(lines)


def write_outputs(summary: dict[str, Any], out: str) -> None:
    text = markdown(summary)
    print()
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1)
    with open(os.path.join(out, "samples.txt"), "w") as f:
        f.write(summary["prime"] + summary["sample"] + "\n")
    print(f"wrote {out}/: results.md results.json samples.txt grad_norms.png grad_norms.csv "
          "tensorboard/")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS
_D = Config()
flags.DEFINE_string("out", _D.out, "Directory for the results, samples and plots.")
flags.DEFINE_string("text_file", None,
                    "A local UTF-8 text file (last 10 % = validation). Default: TFDS "
                    "tiny_shakespeare if prepared locally, else the built-in text.")
flags.DEFINE_bool("download", _D.download,
                  "Let TFDS download tiny_shakespeare when it is not prepared (network).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (for tiny_shakespeare).")
flags.DEFINE_enum("cell", _D.cell, list(CELLS), "Recurrent layer of the stack.")
flags.DEFINE_integer("layers", _D.layers, "Stacked recurrent layers.", lower_bound=1)
flags.DEFINE_integer("units", _D.units, "Units per recurrent layer.", lower_bound=1)
flags.DEFINE_integer("embedding_dim", _D.embedding_dim, "Character embedding size.",
                     lower_bound=1)
flags.DEFINE_float("dropout", _D.dropout, "Dropout between stacked layers.")
flags.DEFINE_integer("bptt_truncate", None,
                     "Truncated BPTT: gradients flow back at most this many steps (WildML).")
flags.DEFINE_integer("length", _D.length, "Sequence length T: characters per training window.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", _D.batch_size, "Windows per batch.", lower_bound=1)
flags.DEFINE_integer("steps", _D.steps, "Training steps.", lower_bound=1)
flags.DEFINE_integer("eval_every", _D.eval_every,
                     "Evaluate the validation perplexity every N steps (must divide --steps).",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("clip_threshold", _D.clip_threshold, "Global-norm clipping threshold.")
flags.DEFINE_integer("record_every", _D.record_every,
                     "GradientNormMonitor: record every N steps.", lower_bound=1)
flags.DEFINE_integer("sample_length", _D.sample_length, "Characters to sample.", lower_bound=0)
flags.DEFINE_float("temperature", _D.temperature, "Sampling temperature.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the shuffling, the weights and the sampling.",
                     lower_bound=0)


def config_from_flags() -> Config:
    return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = run(config_from_flags())
    print(f"total {summary['seconds']} s")


if __name__ == "__main__":
    app.run(main)
