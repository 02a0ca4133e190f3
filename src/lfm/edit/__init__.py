"""Model editing: memory-based editing, constrained tuning, locate-and-edit and meta-learned
editors. Methods register on import; each is an `Editor`, `(handle, requests, cfg) -> patch`
(`lfm.edit.contract`).

    patch = rome(handle, Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"))
    undo = patch.apply(handle.model)   # the only call that changes the model
    undo.revert(handle.model)          # bit-exact
"""

from lfm.edit.ftl import FTLConfig, ft_l
from lfm.edit.grace import CodebookPatch, GraceConfig, grace
from lfm.edit.memit import AlphaEditConfig, MemitConfig, alphaedit, memit
from lfm.edit.memory import IkeConfig, MemoryEditor, MemoryPatch, ike
from lfm.edit.mend import MendConfig, MendEditor, mend, train_mend
from lfm.edit.patch import Delta, Patch, Undo
from lfm.edit.requests import Request, read_requests
from lfm.edit.rome import RomeConfig, rome
from lfm.edit.sequential import AlphaEditState, alphaedit_step
from lfm.edit.site import EditSite, edit_site
from lfm.edit.ultraedit import UltraEditConfig, UltraEditState, ultraedit, ultraedit_step
from lfm.edit.wise import WiseConfig, WiseMemory, wise, wise_step

__all__ = [
    "AlphaEditConfig",
    "AlphaEditState",
    "CodebookPatch",
    "Delta",
    "EditSite",
    "FTLConfig",
    "GraceConfig",
    "IkeConfig",
    "MemitConfig",
    "MemoryEditor",
    "MemoryPatch",
    "MendConfig",
    "MendEditor",
    "Patch",
    "Request",
    "RomeConfig",
    "UltraEditConfig",
    "UltraEditState",
    "Undo",
    "WiseConfig",
    "WiseMemory",
    "alphaedit",
    "alphaedit_step",
    "edit_site",
    "ft_l",
    "grace",
    "ike",
    "memit",
    "mend",
    "read_requests",
    "rome",
    "train_mend",
    "ultraedit",
    "ultraedit_step",
    "wise",
    "wise_step",
]
