"""The serving artifact (function_app/model): export from a checkpoint, load and run it with torch or ONNX Runtime."""
