"""What every measurement shares: the loss table (:mod:`.losses`), finding layers and viewing
their weights (:mod:`.layers`), iterating the data (:mod:`.data`), running the model without
changing it (:mod:`.hooks`), Hessian-vector products (:mod:`.hvp`), distributed reductions
(:mod:`.dist`) and fast Gaussian probes (:mod:`.rng`). Imports only from :mod:`relflat_ext.ops`."""
