"""The data plane: model loading, the step-level engine, the worker and router apps."""
