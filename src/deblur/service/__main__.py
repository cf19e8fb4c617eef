from deblur.core.runtime_env import prefer_passive_openmp

prefer_passive_openmp()   # before anything can import torch (deblur.core.runtime_env)

from deblur.service.server import main  # noqa: E402

main()
