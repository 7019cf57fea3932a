"""The runtime layer under the objectives and the trainer: the config's typed views,
checkpoints, the workdir guard, the run lock, preemption, the compilation cache,
multi-host start-up with the mesh and sharding, and logs.

Nothing here knows an objective: what a relaunch must keep is passed in
(`workdir.check_compatible(..., guarded)`), as are the checkpoints' state shapes.
"""
