"""The old path of :mod:`mpbackprop.tasks.taskfile`, kept for task files that import it
(``from mpbackprop.taskfile import load_arrays``)."""

from .tasks.taskfile import TaskFile, load_arrays, load_task_file

__all__ = ["load_arrays", "load_task_file", "TaskFile"]
