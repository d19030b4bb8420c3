"""The evaluation suite: ``python eval.py --model DIR --tasks ppl,position,memory,niah,mqar``.

One module per task (registered in :data:`TASKS`), :mod:`.runner` to load models and run tasks,
:mod:`.report` for the JSON, plots and table.
"""

# registering the tasks, in the order eval.py runs them by default
from . import ppl  # noqa: F401  isort: skip
from . import position  # noqa: F401  isort: skip
from . import memory  # noqa: F401  isort: skip
from . import niah  # noqa: F401  isort: skip
from . import mqar  # noqa: F401  isort: skip
from .base import LM, TASKS, Task, get_task
from .runner import evaluate

__all__ = ["LM", "TASKS", "Task", "evaluate", "get_task"]
