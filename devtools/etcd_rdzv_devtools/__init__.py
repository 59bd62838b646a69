"""Tools for developing etcd-rdzv, not part of it: a throwaway local etcd (`local_etcd`), the
demo and its torchrun process management (`demo`). The tests, the benchmarks and `make demo`
use them; agents and `etcd-rdzv` never do, and the installed package does not contain them.
"""
