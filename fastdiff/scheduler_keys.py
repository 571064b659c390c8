"""Which diffusers scheduler classes take which of the shared config keys (``scheduler_config._COMMON``).

diffusers' ``from_config`` drops the keys a class's constructor lacks, so a config carrying one (a key left over
from another class's config, or a ``_class_name`` swapped by hand) samples as if it were absent. fastdiff reads such
a key as diffusers does: not at all (``scheduler_config`` resets it to its default). Read from the constructors'
signatures of diffusers 0.42, and from the keys the classes read from their config besides (``sigma_min`` /
``sigma_max``)."""

from __future__ import annotations


def _classes(*names: str) -> frozenset:
    return frozenset(n + "Scheduler" for n in names)


# key -> the classes whose constructor lacks it
NOT_TAKEN: dict = {}
NOT_TAKEN.update(dict.fromkeys(('beta_start', 'beta_end', 'beta_schedule', 'trained_betas'), _classes('EDMEuler',
    'EDMDPMSolverMultistep', 'CMStochasticIterative', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete',
    'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('prediction_type',), _classes('CMStochasticIterative', 'FlowMatchEulerDiscrete',
    'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('rescale_betas_zero_snr',), _classes('HeunDiscrete', 'DPMSolverSinglestep',
    'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE',
    'DEISMultistep', 'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete',
    'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('steps_offset', 'timestep_spacing'), _classes('DPMSolverSinglestep', 'EDMEuler',
    'EDMDPMSolverMultistep', 'CMStochasticIterative', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete',
    'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('thresholding', 'dynamic_thresholding_ratio', 'sample_max_value'),
    _classes('EulerDiscrete', 'EulerAncestralDiscrete', 'HeunDiscrete', 'EDMEuler', 'PNDM', 'LMSDiscrete',
    'CMStochasticIterative', 'DPMSolverSDE', 'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'FlowMatchEulerDiscrete',
    'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('clip_sample', 'clip_sample_range'), _classes('EulerDiscrete',
    'EulerAncestralDiscrete', 'DPMSolverMultistep', 'DPMSolverSinglestep', 'UniPCMultistep', 'EDMEuler',
    'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep',
    'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas'), _classes('DDIM',
    'DDPM', 'EulerAncestralDiscrete', 'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM', 'CMStochasticIterative', 'LCM',
    'TCD', 'FlowMatchHeunDiscrete')))
NOT_TAKEN.update(dict.fromkeys(('use_lu_lambdas',), _classes('DDIM', 'DDPM', 'EulerDiscrete',
    'EulerAncestralDiscrete', 'HeunDiscrete', 'DPMSolverSinglestep', 'UniPCMultistep', 'EDMEuler',
    'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep',
    'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM', 'TCD', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete',
    'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('use_flow_sigmas', 'flow_shift'), _classes('DDIM', 'DDPM', 'EulerDiscrete',
    'EulerAncestralDiscrete', 'HeunDiscrete', 'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete',
    'CMStochasticIterative', 'DPMSolverSDE', 'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM', 'TCD',
    'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('use_dynamic_shifting', 'time_shift_type'), _classes('DDIM', 'DDPM',
    'EulerDiscrete', 'EulerAncestralDiscrete', 'HeunDiscrete', 'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM',
    'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM', 'TCD',
    'FlowMatchHeunDiscrete')))
NOT_TAKEN.update(dict.fromkeys(('final_sigmas_type',), _classes('DDIM', 'DDPM', 'EulerAncestralDiscrete',
    'HeunDiscrete', 'PNDM', 'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep',
    'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM', 'TCD', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete',
    'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('variance_type',), _classes('DDIM', 'EulerDiscrete', 'EulerAncestralDiscrete',
    'HeunDiscrete', 'UniPCMultistep', 'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete',
    'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep', 'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM',
    'TCD', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
NOT_TAKEN.update(dict.fromkeys(('lambda_min_clipped',), _classes('DDIM', 'DDPM', 'EulerDiscrete',
    'EulerAncestralDiscrete', 'HeunDiscrete', 'UniPCMultistep', 'EDMEuler', 'EDMDPMSolverMultistep', 'PNDM',
    'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep', 'KDPM2Discrete',
    'KDPM2AncestralDiscrete', 'LCM', 'TCD', 'FlowMatchEulerDiscrete', 'FlowMatchHeunDiscrete', 'FlowMatchLCM')))
# (sigma_min / sigma_max: Heun, KDPM2 (and ancestral), LMS, DPM-Solver multistep / singlestep / SDE, DEIS and
# FlowMatchEuler / LCM lack them in their constructors yet read them from their config, where from_config keeps
# every key, for their Karras / exponential / beta grids (LMS's and DPMSolverSDE's Karras grids excepted:
# scheduler_config)
NOT_TAKEN.update(dict.fromkeys(('sigma_min', 'sigma_max'), _classes('DDIM', 'DDPM', 'EulerAncestralDiscrete', 'PNDM',
    'LCM', 'TCD', 'FlowMatchHeunDiscrete')))
NOT_TAKEN.update(dict.fromkeys(('shift_terminal',), _classes('DDIM', 'DDPM', 'EulerDiscrete',
    'EulerAncestralDiscrete', 'HeunDiscrete', 'DPMSolverMultistep', 'DPMSolverSinglestep', 'EDMEuler',
    'EDMDPMSolverMultistep', 'PNDM', 'LMSDiscrete', 'CMStochasticIterative', 'DPMSolverSDE', 'DEISMultistep',
    'KDPM2Discrete', 'KDPM2AncestralDiscrete', 'LCM', 'TCD', 'FlowMatchHeunDiscrete')))


def ignored_keys(class_name: str) -> frozenset:
    """The shared keys ``class_name`` does not take (diffusers ignores them in its configs)."""
    return frozenset(k for k, classes in NOT_TAKEN.items() if class_name in classes)
