"""The real runtime: one worker per process over torch.distributed, with a coordinator for
membership, rounds that commit or abort, state transfer to joiners, and checkpoints.

    islands coordinator --port 29400 --token-file secret.txt
    islands run config.toml --coordinator host:29400 --worker-id 0 --token-file secret.txt
    islands launch config.toml --workers 4 --out runs/local

See ``docs/runtime.md``.
"""
