"""Hugging Face form of an export folder.

`configuration_loopmdm.py` and `modeling_loopmdm.py` are templates: `loopjax export` copies them
into the export, where `transformers` runs them as remote code (`trust_remote_code=True`). They
import only torch and transformers; loopjax itself never imports them. `tokenizer_files` and
`model_card` write the export's tokenizer files and README.md (no torch needed).
"""

TEMPLATES = ("configuration_loopmdm.py", "modeling_loopmdm.py")
MODEL_TYPE = "loopmdm"
