"""The code MLflow stores with the logged generator and runs to load it (see
:mod:`pof3d.tracking.logged_model`)."""

from mlflow.models import set_model

from pof3d.tracking.logged_model import GeneratorModel

set_model(GeneratorModel())
