"""Imported before Paddle by every script: `import paddle` warns on stderr that ccache is missing (it would
only speed up a rebuild of the fused CPU kernels), which would precede every one-line message."""
import warnings

warnings.filterwarnings("ignore", message="No ccache found")
