"""Choosing each next token from a row of logits, for the worker's batched decode
(`agent.serving.batch`), as onnxruntime-genai's search does for its own generators:
the repetition penalty over every token of the sequence, then the request's logit
adjustments (logit_bias, OpenAI's presence and frequency penalties over the completion),
then greedy argmax, or temperature, top-k and top-p sampling; and the log-probabilities
a request asks for.

The arithmetic over a row (a vocabulary of 49k floats or more) runs in three small onnxruntime
graphs built here (`agent.serving.onnx_proto`), on the decoder's own logits memory: the worker
imports no numpy (which costs a process ~15 MB). A `Sampler` is one request's state (options,
random stream, the tokens it has seen); the `TokenChooser` runs the graphs.

Threading: one thread (the worker's main thread).
"""

from __future__ import annotations

import array
import collections
import ctypes
import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from agent.serving import ort
from agent.serving.onnx_proto import DOUBLE, FLOAT, INT64, Node, Value, model
from agent.wire.worker import MAX_TOP_LOGPROBS, SamplingOptions

# OpenAI's floor for a log-probability: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


def logit_additions(options: SamplingOptions, counts: Mapping[int, int]) -> dict[int, float]:
    """What to add to a step's logits: the request's biases, less OpenAI's penalties for every
    token the completion holds so far (`counts`: presence once, frequency per occurrence)."""
    add: dict[int, float] = {}
    for bias in options.logit_bias:
        add[bias.token_id] = add.get(bias.token_id, 0.0) + bias.bias
    if options.presence_penalty or options.frequency_penalty:
        for token, count in counts.items():
            add[token] = add.get(token, 0.0) - options.presence_penalty - options.frequency_penalty * count
    return add


@dataclass(frozen=True)
class Logits:
    """`rows` rows of `vocab` float32 logits from `address`, inside `owner` (which keeps the
    memory alive while they are read)."""

    owner: ort.Memory
    address: int
    rows: int
    vocab: int

    @classmethod
    def of(cls, floats: array.array[float]) -> Logits:
        """One row held in an `array('f')`."""
        return cls(floats, ort.address_of(floats), 1, len(floats))

    def row(self, index: int) -> Logits:
        return Logits(self.owner, self.address + 4 * index * self.vocab, 1, self.vocab)

    def values(self) -> array.array[float]:
        """A copy of the first row."""
        out = array.array("f")
        out.frombytes(ctypes.string_at(self.address, 4 * self.vocab))
        return out

    def tensor(self) -> ort.Tensor:
        return ort.Tensor(self.owner, (self.rows, self.vocab), ort.FLOAT, address=self.address)


class Sampler:
    """One request's choice of tokens: its options, its random stream, what it has seen."""

    def __init__(self, options: SamplingOptions, prompt_ids: Iterable[int]) -> None:
        self.options = options
        # A seeded request samples the same tokens every time it is sent; others draw fresh entropy.
        self._random = random.Random(options.seed)
        self._seen: set[int] = set(prompt_ids)  # the repetition penalty's tokens: the whole sequence
        self._counts: collections.Counter[int] = collections.Counter()  # the completion's, for OpenAI's penalties

    @property
    def adjusts(self) -> bool:
        """Whether a row's logits change before the choice (otherwise they are used as they are)."""
        return self.options.repetition_penalty != 1.0 or self.options.adjusts_logits

    @property
    def is_plain_greedy(self) -> bool:
        """The largest logit, unadjusted: a batch of such rows is one argmax."""
        return self.options.temperature == 0.0 and not self.adjusts

    def took(self, token: int) -> None:
        """`token` is the sequence's next (the penalties count it from now on)."""
        self._seen.add(token)
        self._counts[token] += 1

    def penalized(self, vocab: int) -> list[int]:
        """The tokens the repetition penalty applies to (none when it is off)."""
        if self.options.repetition_penalty == 1.0:
            return []
        return sorted(t for t in self._seen if 0 <= t < vocab)

    def additions(self, vocab: int) -> dict[int, float]:
        """What to add to the logits before the choice (`logit_additions`; ids outside the vocabulary
        are skipped)."""
        return {t: d for t, d in logit_additions(self.options, self._counts).items() if 0 <= t < vocab}

    def uniform(self) -> float:
        """The next number of this request's random stream, in [0, 1)."""
        return self._random.random()


def _flat(name: str) -> list[Node]:
    """`name` as a vector: the graphs take a row of shape (1, vocabulary)."""
    return [Node("Constant", [], ["flat_shape"], {"value_ints": [-1]}),
            Node("Reshape", [name, "flat_shape"], ["x"])]


def _argmax_graph() -> bytes:
    return model("argmax", [Node("ArgMax", ["logits"], ["tokens"], {"axis": 1, "keepdims": 0})],
                 [Value("logits", FLOAT, ["rows", "vocab"])], [Value("tokens", INT64, ["rows"])])


Draw = Literal["greedy", "whole", "ranked"]


def _choose_graph(draw: Draw) -> bytes:
    """One row's next token, after the penalties and additions: the largest (`greedy`), or drawn
    with `u` (uniform in [0, 1)) by the inverse of the cumulative distribution at the temperature,
    over the whole vocabulary as it is (`whole`: top-k and top-p off, no sort needed) or over the
    top-k tokens whose mass before them is under top_p (`ranked`)."""
    ranked = draw == "ranked"
    nodes = [
        *_flat("logits"),
        # The repetition penalty: seen tokens' positive logits divided by it, negative ones multiplied.
        Node("Gather", ["x", "seen"], ["seen_logits"]),
        Node("Constant", [], ["zero"], {"value_float": 0.0}),
        Node("Less", ["seen_logits", "zero"], ["negative"]),
        Node("Mul", ["seen_logits", "penalty"], ["multiplied"]),
        Node("Div", ["seen_logits", "penalty"], ["divided"]),
        Node("Where", ["negative", "multiplied", "divided"], ["penalized"]),
        Node("ScatterElements", ["x", "seen", "penalized"], ["x_penalized"]),
        Node("ScatterElements", ["x_penalized", "add_ids", "add_values"], ["adjusted"], {"reduction": "add"}),
    ]
    one = [1]
    inputs = [Value("logits", FLOAT, [1, "vocab"]), Value("seen", INT64, ["seen_count"]),
              Value("penalty", FLOAT, one), Value("add_ids", INT64, ["add_count"]),
              Value("add_values", FLOAT, ["add_count"])]
    if draw == "greedy":
        nodes.append(Node("ArgMax", ["adjusted"], ["token"], {"axis": 0, "keepdims": 1}))
        return model("choose", nodes, inputs, [Value("token", INT64, one)])
    nodes += [
        Node("Mul", ["adjusted", "inv_temperature"], ["scaled"]),
        Node("Constant", [], ["axis0"], {"value_int": 0}),
    ]
    if ranked:
        nodes += [
            Node("TopK", ["scaled", "top_k"], ["best", "best_ids"], {"axis": 0, "largest": 1, "sorted": 1}),
            Node("Softmax", ["best"], ["probs"], {"axis": 0}),
            Node("CumSum", ["probs", "axis0"], ["cumulative"]),
            Node("Sub", ["cumulative", "probs"], ["mass_before"]),
            Node("Less", ["mass_before", "top_p"], ["in_nucleus"]),  # the first always is
            Node("Cast", ["in_nucleus"], ["in_nucleus_f"], {"to": FLOAT}),
            Node("Mul", ["probs", "in_nucleus_f"], ["kept"]),
        ]
    else:
        nodes.append(Node("Softmax", ["scaled"], ["kept"], {"axis": 0}))
    nodes += [
        Node("CumSum", ["kept", "axis0"], ["kept_cumulative"]),
        Node("Constant", [], ["last"], {"value_ints": [-1]}),
        Node("Gather", ["kept_cumulative", "last"], ["kept_mass"]),
        Node("Mul", ["kept_mass", "u"], ["threshold"]),
        Node("GreaterOrEqual", ["kept_cumulative", "threshold"], ["reached"]),
        Node("Cast", ["reached"], ["reached_f"], {"to": FLOAT}),
        Node("ArgMax", ["reached_f"], ["drawn"], {"axis": 0, "keepdims": 1}),  # the first that reaches it
        Node("Gather", ["best_ids", "drawn"], ["token"]) if ranked else Node("Identity", ["drawn"], ["token"]),
    ]
    inputs += [Value("inv_temperature", FLOAT, one), Value("u", FLOAT, one)]
    if ranked:
        inputs += [Value("top_k", INT64, one), Value("top_p", FLOAT, one)]
    return model("choose", nodes, inputs, [Value("token", INT64, one)])


def _logprobs_graph(top: int) -> bytes:
    """A row's log-softmax (in doubles, with the max shifted out) at `token`, and at its `top`
    likeliest tokens (best first; ties by lower id, as TopK orders them)."""
    nodes = [
        *_flat("logits"),
        Node("Cast", ["x"], ["xd"], {"to": DOUBLE}),
        Node("ReduceMax", ["xd"], ["peak"], {"keepdims": 1}),
        Node("Sub", ["xd", "peak"], ["shifted"]),
        Node("Exp", ["shifted"], ["e"]),
        Node("ReduceSum", ["e"], ["total"], {"keepdims": 1}),
        Node("Log", ["total"], ["log_total_shifted"]),
        Node("Add", ["peak", "log_total_shifted"], ["log_total"]),
        Node("Gather", ["xd", "token"], ["token_logit"]),
        Node("Sub", ["token_logit", "log_total"], ["token_logprob"]),
        Node("Constant", [], ["k"], {"value_ints": [top]}),
        Node("TopK", ["xd", "k"], ["top_logits", "top_ids"], {"axis": 0, "largest": 1, "sorted": 1}),
        Node("Sub", ["top_logits", "log_total"], ["top_logprobs"]),
    ]
    return model("logprobs", nodes, [Value("logits", FLOAT, [1, "vocab"]), Value("token", INT64, [1])],
                 [Value("token_logprob", DOUBLE, [1]), Value("top_ids", INT64, [top]),
                  Value("top_logprobs", DOUBLE, [top])])


def _session(graph: bytes) -> ort.Session:
    # One thread: a row is too little work to share. No arena: a run's scratch is freed after it.
    return ort.Session(graph, threads=1, arena=False)


class TokenChooser:
    """The graphs of this module, in sessions of their own."""

    def __init__(self) -> None:
        self._argmax = _session(_argmax_graph())
        self._choose = {draw: _session(_choose_graph(draw)) for draw in get_args(Draw)}
        self._logprobs: dict[int, ort.Session] = {}  # by how many top tokens (the vocabulary may have fewer)
        self._bindings: dict[int, ort.Binding] = {}

    def _binding(self, session: ort.Session) -> ort.Binding:
        binding = self._bindings.get(id(session))
        if binding is None:
            binding = self._bindings[id(session)] = session.binding()
        return binding

    def greedy(self, rows: Sequence[Logits]) -> list[int]:
        """The largest logit's token of each row, in as few runs as the rows' memory allows (rows of
        one run of the decoder are one tensor)."""
        out: dict[int, int] = {}
        by_owner: dict[int, list[int]] = {}
        for n, row in enumerate(rows):
            by_owner.setdefault(id(row.owner), []).append(n)
        for members in by_owner.values():
            first = min(rows[n].address for n in members)
            vocab = rows[members[0]].vocab
            span = (max(rows[n].address for n in members) - first) // (4 * vocab) + 1
            tokens = array.array("q", bytes(8 * span))
            binding = self._binding(self._argmax)
            binding.bind("logits", Logits(rows[members[0]].owner, first, span, vocab).tensor())
            binding.bind("tokens", ort.Tensor(tokens, (span,), ort.INT64), output=True)
            self._argmax.run(binding)
            for n in members:
                out[n] = tokens[(rows[n].address - first) // (4 * vocab)]
        return [out[n] for n in range(len(rows))]

    def choose(self, row: Logits, sampler: Sampler) -> int:
        """`sampler`'s next token from one row of logits (then counted as seen)."""
        options, vocab = sampler.options, row.vocab
        top_k = options.top_k if 0 < options.top_k < vocab else vocab
        draw: Draw = "greedy" if options.temperature == 0.0 else \
            "ranked" if top_k < vocab or options.top_p < 1.0 else "whole"
        seen, penalty = array.array("q", sampler.penalized(vocab)), options.repetition_penalty
        if not seen:
            seen, penalty = array.array("q", [0]), 1.0  # dividing by 1 changes nothing
        additions = sampler.additions(vocab)
        add_ids = array.array("q", additions or [0])
        add_values = array.array("f", additions.values() or [0.0])
        scalars = array.array("f", [penalty, 0.0, 0.0, options.top_p])
        if draw != "greedy":
            scalars[1], scalars[2] = 1.0 / options.temperature, sampler.uniform()
        integers = array.array("q", [0, top_k])  # the token (the output), top_k
        session = self._choose[draw]
        binding = self._binding(session)
        binding.bind("logits", row.tensor())
        binding.bind("seen", ort.Tensor(seen, (len(seen),), ort.INT64))
        binding.bind("add_ids", ort.Tensor(add_ids, (len(add_ids),), ort.INT64))
        binding.bind("add_values", ort.Tensor(add_values, (len(add_values),), ort.FLOAT))
        floats, ints = scalars.buffer_info()[0], integers.buffer_info()[0]
        scalar_inputs = {"greedy": 1, "whole": 3, "ranked": 4}[draw]
        for i, name in enumerate(("penalty", "inv_temperature", "u", "top_p")[:scalar_inputs]):
            binding.bind(name, ort.Tensor(scalars, (1,), ort.FLOAT, address=floats + 4 * i))
        if draw == "ranked":
            binding.bind("top_k", ort.Tensor(integers, (1,), ort.INT64, address=ints + 8))
        binding.bind("token", ort.Tensor(integers, (1,), ort.INT64), output=True)
        session.run(binding)
        token = integers[0]
        sampler.took(token)
        return token

    def log_softmax_at(self, row: Logits, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
        """The natural-log probability of `token` under softmax(row), and the `top_n` likeliest token
        ids with theirs (best first; ties by lower id), each floored at MIN_LOGPROB."""
        top = min(MAX_TOP_LOGPROBS, row.vocab)
        session = self._logprobs.get(top)
        if session is None:
            session = self._logprobs[top] = _session(_logprobs_graph(top))
        token_input = array.array("q", [token])
        token_logprob = array.array("d", [0.0])
        top_ids = array.array("q", bytes(8 * top))
        top_logprobs = array.array("d", bytes(8 * top))
        binding = self._binding(session)
        binding.bind("logits", row.tensor())
        binding.bind("token", ort.Tensor(token_input, (1,), ort.INT64))
        binding.bind("token_logprob", ort.Tensor(token_logprob, (1,), ort.DOUBLE), output=True)
        binding.bind("top_ids", ort.Tensor(top_ids, (top,), ort.INT64), output=True)
        binding.bind("top_logprobs", ort.Tensor(top_logprobs, (top,), ort.DOUBLE), output=True)
        session.run(binding)
        best = [(top_ids[i], max(MIN_LOGPROB, top_logprobs[i])) for i in range(min(top_n, top))]
        return max(MIN_LOGPROB, token_logprob[0]), best


@functools.cache
def chooser() -> TokenChooser:
    """The process's token chooser (its graphs are built on first use)."""
    return TokenChooser()
