"""The models-from-code file MLflow logs with every LoRA adapter version (see deblur.tracking.lora_pyfunc.log_adapter_model).

MLflow runs this file when the model loads; the adapter files, its base reference and the tile
settings come from the logged artifacts and model_config, so nothing here is pickled.
"""

import mlflow

from deblur.tracking.lora_pyfunc import LoraAdapterPyfunc

mlflow.models.set_model(LoraAdapterPyfunc())
