"""Discrete diffusion processes (masked/absorbing with a schedule; SEDD score entropy) and their schedules."""

from sgdd.diffusion.base import NOISES, PROCESSES, SCHEDULES, Process, build_process

__all__ = ["NOISES", "PROCESSES", "SCHEDULES", "Process", "build_process"]
