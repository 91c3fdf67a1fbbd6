"""Input gradients of a loss Cell in either mode, for the tests."""
from mindspore import nn, ops


class Gradients(nn.Cell):
    """The input gradients of `loss`, as a Cell: GRAPH mode keys a Cell's compiled graph by its creation, while
    a bare GradOperation(...)(cell)(...) call is keyed by an id() that a garbage-collected function of an earlier
    test may have had (seen once: a stale graph from another test file was run)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.grad = ops.GradOperation(get_all=True)

    def construct(self, *inputs):
        return self.grad(self.loss)(*inputs)
