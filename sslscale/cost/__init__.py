"""What a run will cost before it starts: the plan (batches, steps, lr, parameters, FLOPs, memory), the
memory of one step, the peak FLOP rates of known GPUs and the toolchain torch.compile needs.

plan.py               `sslscale plan`, and plan.json of every run
model_state.py        parameters per module; weights, gradients and optimizer state per rank
flops.py              FLOPs of a training step per image
step_memory.py        the memory of one step (activations counted on the meta device) and the refusal
hardware.py           device names and their dense peak FLOP rates
compile_toolchain.py  what torch.compile needs on this machine
"""
