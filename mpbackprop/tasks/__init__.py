"""Tasks to train on: the registry of datasets, architectures and task families, and task files (--task)."""

from .registry import (ARCHS, DATASETS, FAMILIES, ON_FORGET, SPLITS, Task, TaskFamily, TaskSpec, forget, get_family,
                       load_dataset, register_arch, register_dataset, register_family)
from .taskfile import TaskFile, load_arrays, load_task_file

__all__ = [
    # registry
    "ARCHS", "DATASETS", "FAMILIES", "ON_FORGET", "SPLITS", "Task", "TaskFamily", "TaskSpec", "forget", "get_family",
    "load_dataset", "register_arch", "register_dataset", "register_family",
    # taskfile
    "TaskFile", "load_arrays", "load_task_file",
]
