"""The study's sweeps go on past the end of a grid that holds the best validation score, so that no method
is held back by where its grid stopped."""

EXTEND = 3  # values added past an end, at most


def beyond_edge(values, scores):
    """The value continuing `values` (numbers, any order; `scores` alike) past the end that holds the best
    score (ties: the smaller value), at the ratio of the two values there; None when the best lies inside or
    there is no ratio (one value)."""
    pairs = sorted(zip(values, scores))
    best = max(range(len(pairs)), key=lambda i: (pairs[i][1], -i))
    if len(pairs) < 2 or 0 < best < len(pairs) - 1:
        return None
    (a, _), (b, _) = pairs[-2:] if best == len(pairs) - 1 else pairs[1::-1]
    return b * b / a
