"""The one exception type sparselm raises for bad input.

Every message names the problem and the fix; the CLI prints it as a single line.
"""


class SparselmError(ValueError):
    """Bad input or an unusable model/data set, with a message that says how to fix it."""
