"""The models-from-code file MLflow logs with every deblur model (see deblur.tracking.pyfunc.log_deblur_model).

MLflow runs this file when the model loads; the checkpoint and tile settings come from the
logged artifacts and model_config, so nothing here is pickled.
"""

import mlflow

from deblur.tracking.pyfunc import DeblurPyfunc

mlflow.models.set_model(DeblurPyfunc())
