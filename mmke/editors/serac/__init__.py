"""SERAC (Mitchell et al., ICML 2022): ``serac`` is the published method with its text-only scope
classifier (:mod:`.text`); ``serac-mm`` is mmke's variant with an image-aware classifier
(:mod:`.image`), and ``serac-mm-gated`` adds a hard image gate to it. All share the memory, the
counterfactual model and the routing (:mod:`.editor`)."""

from mmke.editors.serac.editor import SERACBase, SERACBaseConfig
from mmke.editors.serac.image import SERACMMConfig, SERACMMEditor, SERACMMGatedConfig, SERACMMGatedEditor
from mmke.editors.serac.text import SERACConfig, SERACEditor

__all__ = ["SERACBase", "SERACBaseConfig", "SERACConfig", "SERACEditor", "SERACMMConfig", "SERACMMEditor",
           "SERACMMGatedConfig", "SERACMMGatedEditor"]
