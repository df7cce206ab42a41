"""Failures of laplace-torch's test suite under a pushforward mode that are understood.

Each entry is ``(modes, node id pattern (``*`` for any text), class, reason)``:

* ``difference``: a deliberate, documented difference of pushforward (README, section
  "laplace-torch"): the test asserts a limitation of laplace-torch that pushforward lifts;
* ``implementation-detail``: the test checks how laplace-torch computes, not what;
* ``known-bug``: a pushforward bug with an open issue; ``run.py`` still counts it as a failure
  (non-zero exit) until it is fixed and the entry removed.

Failures that also occur in the unmodified run are classified as ``baseline`` by ``run.py``.
"""

DIAG_EF_ON_MAPPINGS = (
    "laplace-torch's fit refuses DiagLaplace with backend == CurvlinopsEF on dict (Hugging Face) "
    "batches (its CurvlinopsEF.diag vmaps over the mapping and fails); PushforwardEF, a "
    "subclass and so not equal, computes the diagonal empirical Fisher there (README, "
    "'What laplace-torch checks by exact class or name'). The test asserts the refusal"
)

EXPECTED: list[tuple[tuple[str, ...], str, str, str]] = [
    (
        ("backends", "both"),
        "tests/test_baselaplace.py::test_dict_data[*-PushforwardEF-DiagLaplace]",
        "difference",
        DIAG_EF_ON_MAPPINGS + " (pytest: DID NOT RAISE ValueError).",
    ),
    (
        ("backends", "both"),
        "tests/test_baselaplace.py::test_dict_data_diagEF_curvlinops_fails[*]",
        "difference",
        DIAG_EF_ON_MAPPINGS + "; without the refusal, fit reads the default dict_key_y "
        "'labels', which the test's loader (keys 'test_input_key'/'test_label_key') lacks: "
        "KeyError.",
    ),
]


SOFT_TARGETS = (
    "test_dtype fits classification on targets torch.randn(10, 3): soft labels whose rows do "
    "not sum to one. The GGN of cross-entropy with soft labels y is sum(y) (diag p - p p^T); "
    "laplace-torch's CurvlinopsGGN.full (curvlinops' GGN of the loss) scales with sum(y), while "
    "its own CurvlinopsGGN.diag, BackPACK, ASDL and PushforwardGGN use diag p - p p^T "
    "(sum(y) = 1). PushforwardGGN.full equals laplace-torch's CurvlinopsGGN.diag on these "
    "targets (to 2e-16) and CurvlinopsGGN.full on probability targets."
)

# Calls compared by --pf-compare whose difference from laplace-torch's own result is understood:
# (modes, node id pattern, compared call, reason).
EXPECTED_MISMATCHES: list[tuple[tuple[str, ...], str, str, str]] = [
    (
        ("backends", "both"),
        "tests/test_baselaplace.py::test_dtype[classification-*-PushforwardGGN-FullLaplace]",
        "CurvlinopsGGN.full",
        SOFT_TARGETS,
    ),
    (
        ("backends", "both"),
        "tests/test_curv_backends_curvlinops.py::test_full_ggn_stochastic",
        "CurvlinopsGGN.full",
        "the Monte Carlo GGN (stochastic=True, mc_samples=k) draws its k targets per example from "
        "another random stream than curvlinops' (laplace-torch's sampling: one categorical draw "
        "per sample from the softmax); both are unbiased estimates of the exact GGN, so they "
        "differ by Monte Carlo error, which shrinks with k (4e-2 at k = 1, 4e-3 at k = 100).",
    ),
]
