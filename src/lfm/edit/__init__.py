"""Model editing: memory-based editing, constrained tuning, locate-and-edit and meta-learned
editors. Methods register on import.

    patch = rome(handle, Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"))
    undo = patch.apply(handle.model)   # the only call that changes the model
    undo.revert(handle.model)          # bit-exact
"""

from lfm.edit.ftl import FTLConfig, ftl
from lfm.edit.memit import AlphaEditConfig, MemitConfig, alphaedit, memit
from lfm.edit.memory import IkeConfig, MemoryEditor, ike
from lfm.edit.patch import Delta, Patch, Undo
from lfm.edit.requests import Request, read_requests
from lfm.edit.rome import RomeConfig, rome
from lfm.edit.sequential import AlphaEditState, alphaedit_step

__all__ = [
    "AlphaEditConfig",
    "AlphaEditState",
    "Delta",
    "FTLConfig",
    "IkeConfig",
    "MemitConfig",
    "MemoryEditor",
    "Patch",
    "Request",
    "RomeConfig",
    "Undo",
    "alphaedit",
    "alphaedit_step",
    "ftl",
    "ike",
    "memit",
    "read_requests",
    "rome",
]
