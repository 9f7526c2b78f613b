"""The grids of the baselines, and the rule every sweep of the study follows: it goes on past the end of a
grid that holds the best validation score, so that no method is held back by where its grid stopped."""

EXTEND = 3  # values added past an end, at most
BASELINE_GRIDS = {"logreg": ("C", (0.01, 0.1, 1.0, 10.0)),  # inverse L2 strength
                  "knn": ("k", (1, 3, 5, 10, 20, 50)),
                  "cnn": ("lr", (3e-4, 1e-3, 3e-3)), "cnn_vit_aug": ("lr", (3e-4, 1e-3, 3e-3))}
BASELINE_METHODS = {"logreg_pixels": ("logreg", ("pixels",)), "logreg_mae": ("logreg", ("mae_cls", "mae_avg")),
                    "knn_pixels": ("knn", ("pixels",)), "knn_mae": ("knn", ("mae_cls", "mae_avg")),
                    "cnn": ("cnn", ("pixels",)), "cnn_vit_aug": ("cnn_vit_aug", ("pixels",))}


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
