"""Everything that talks to MLflow: runs, registry IO, pyfunc flavours."""
