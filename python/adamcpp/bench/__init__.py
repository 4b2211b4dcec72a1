"""adamcpp-bench: Adam step throughput, side by side with the alternatives and
the machine's memory-bandwidth ceiling, measured in the same run.

An Adam step reads p, g, m, v and writes p, m, v: 7 values per element
(9 with amsgrad), so at any size beyond the caches it is bound by memory
bandwidth. Every contender is therefore shown next to two references measured
in the same run, on the same working-set size:

* ``ceiling``: the simplest ``omp parallel for simd`` float32 Adam loop over one
  buffer set (``adamcpp._core.ceiling_adam``), i.e. what a plain loop reaches;
* ``triad``: the STREAM triad ``a = b + s*c`` over float64 arrays
  (``adamcpp._core.triad``, 24 bytes per element), i.e. the memory bandwidth.

Method: for each case every buffer is allocated once; each contender is warmed
up, then calibrated so that one timed sample (k back-to-back steps) lasts at
least ``--min-time``; ``--repeats`` rounds follow in which every contender takes
one sample in turn (the order rotates each round). The median sample is
reported with its min and max.

Run ``adamcpp-bench --help`` (or ``python -m adamcpp.bench --help``); see
bench/README.md for what the columns mean.

The modules, by job: ``cases`` (what a case is, option parsers), ``contenders``
(the steps and references), ``timing`` (timed loops, warm-up, rounds, derived
figures, the progress bar), ``machine`` (machine info, optional imports, the
bandwidth probe), ``report`` (tables and the JSON report), ``plot`` and ``cli``
(the command line and the sweep).
"""

from __future__ import annotations

from .cases import DTYPES, PRECISIONS, VARIANTS, Case, Precision, Shape, parse_sizes, parse_threads
from .cli import build_parser, main
from .contenders import (
    CONTENDERS,
    FACTORIES,
    REFERENCES,
    AdamcppBlockedContender,
    AdamcppContender,
    CeilingContender,
    CeilingNogenContender,
    Contender,
    DeepSpeedContender,
    NumpyContender,
    TorchForeachContender,
    TorchFusedContender,
    TriadContender,
    Unavailable,
)

__all__ = [
    "CONTENDERS",
    "DTYPES",
    "FACTORIES",
    "PRECISIONS",
    "REFERENCES",
    "VARIANTS",
    "AdamcppBlockedContender",
    "AdamcppContender",
    "Case",
    "CeilingContender",
    "CeilingNogenContender",
    "Contender",
    "DeepSpeedContender",
    "NumpyContender",
    "Precision",
    "Shape",
    "TorchForeachContender",
    "TorchFusedContender",
    "TriadContender",
    "Unavailable",
    "build_parser",
    "main",
    "parse_sizes",
    "parse_threads",
]
