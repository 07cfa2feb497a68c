"""The processes of a run and what passes between them.

process_group.py  ranks and devices from torchrun or SLURM variables; the process group
peer_watch.py     which rank broke a collective (a heartbeat in the rendezvous store)
collectives.py    gathers and sums over ranks that keep gradients
batchnorm.py      BatchNorm whose statistics span every rank
parallel.py       the DDP / FSDP2 wrap, and a shard's local tensor
"""
