"""The body of each DVC stage, one module per stage (``pipelines/<stage>.py`` only parses arguments).

``spec`` declares what each stage reads; the test suite checks ``dvc.yaml`` against it.
"""
