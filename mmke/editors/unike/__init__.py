"""UniKE: unified intrinsic + latent in-context knowledge editing (SPEC §5).

- :mod:`.intrinsic` new FFN key-value neurons and their training;
- :mod:`.memory` the latent-IKE memory and the shift of the edited layers' outputs;
- :mod:`.encoders` the semantic and truthfulness encoders and their contrastive losses;
- :mod:`.editor` the editor and its registered variants.

Training (memory + encoders) is :mod:`mmke.train.unike`, reached through ``mmke train --method unike``.
"""

from mmke.editors.unike.editor import (UniKEConfig, UniKEEditor, UniKEIntrinsicEditor, UniKEIntrinsicIKEEditor,
                                       UniKELatentEditor, UniKENoCollabEditor, UniKEPlusEditor)

__all__ = ["UniKEConfig", "UniKEEditor", "UniKEIntrinsicEditor", "UniKEIntrinsicIKEEditor", "UniKELatentEditor",
           "UniKENoCollabEditor", "UniKEPlusEditor"]
