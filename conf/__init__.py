"""The job's Hydra configs, installed as the package `ssim_ray_conf` (see pyproject.toml) so that the job finds them
from any folder. The YAML files beside this one are the configs."""
