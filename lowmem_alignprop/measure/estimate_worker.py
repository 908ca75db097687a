"""What plan --fastest's worker processes import first (the fork server's preload, measure/fastest.py): the libraries
quieted before they load (their import-time warnings would repeat on the search's console for every worker), then
the planner and diffusers' SD pipeline, so that each worker forked from the server starts with them imported."""

from lowmem_alignprop.settings.quiet import quiet_libraries

quiet_libraries()

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: E402,F401

from lowmem_alignprop.measure import planner  # noqa: E402,F401
