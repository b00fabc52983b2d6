"""idql-runtime: Implicit Diffusion Q-Learning as a robot-control runtime.

Library layout (the folder tree is the architecture):
    config.py        typed configuration dataclasses, YAML + ``--set`` overrides
    networks.py      LN-ResNet score network, Q ensemble, V (idql-reference.md s1, s3)
    diffusion.py     beta schedules, DDPM loss, reverse sampler (s2)
    critic.py        generalised IQL value losses and implicit-policy weights (paper Thm 4.1)
    decision.py      the pure decision function decide(obs, noise) (design.md)
    agent.py         parameters, optimisers and the update steps (actor, V, Q)
    checkpoint.py    safetensors + JSON checkpoints, atomic, hashed
    replay.py        the zarr replay store (only module that touches zarr)
    datasets.py      import/export of standard dataset formats
    protocol.py      the wire protocol (msgpack messages, limits)
    transport/       ZeroMQ sockets (only package that touches zmq): security,
                     sockets, actor_link, learner_link, action_server
    engines/         compiled decision engines (eager, CPU, CUDA graph, compile, TensorRT)
"""

__version__ = "0.1.0"
