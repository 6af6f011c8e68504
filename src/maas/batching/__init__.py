"""Every batching strategy of the service, in one package.

=====================  ===================================================================
module                 what
=====================  ===================================================================
:mod:`.jobs`           what crosses deployments (a front batch of jobs as numpy, per-job
                       errors) and the one take rule every queue uses (:func:`take_whole`)
:mod:`.front`          front batching in the ingress: concurrent requests for one model
                       address become one preprocessor call chained into one model call
:mod:`.pull`           pull batching on a model replica: the forward thread takes what is
                       queued when it frees
:mod:`.continuous`     continuous (iteration-level) batching for decoder-only generators
=====================  ===================================================================

All of them form batches where work is pulled: a batch leaves when the consumer (the model
replica, its forward thread, the decoding loop) is free, never on a timer alone. None imports
torch except :mod:`.continuous`, which runs on the generator replica.
"""
