# The same small Llama and calibration batch as the structured-pruning tests.
from tests.structured.conftest import calib, llama, make_llama  # noqa: F401
