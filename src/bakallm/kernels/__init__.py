"""Fast kernels with a pure-PyTorch reference beside each: the selective scan's backends."""
