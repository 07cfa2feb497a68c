"""Pretraining: the loop and what runs around its steps.

loop.py            Trainer: build, restore, step, check, save; pretrain() for one run folder
device.py          the device, precision and memory layout of a process
preflight.py       checks before anything is written or any GPU time is spent
step_checks.py     non-finite losses and agreement over ranks, decided on the device
stop_signals.py    the signals that stop a run (pre-emption, time limits, Ctrl-C) and the requeue exit
monitor.py         console lines and TensorBoard: loss, images/s, ETA, MFU
rankme_tracker.py  RankMe of recent trunk features during training
console.py         console.log of a run folder
bench.py           `sslscale bench`: the trainer's own step, timed
"""
