"""Triton kernels, one file per op: kernels, launchers, autograd.Function, public function."""
