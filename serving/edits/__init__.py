"""Image edits with mask-aware activation caching (issue 3): masks, the template cache, masked UNet compute.

A template is run once in full while its per-step attention-block activations are recorded
(`masked_unet.MaskedUNet` with `RecordRow`s into a `cache.TemplateCache`); an edit of it then
recomputes the transformer blocks only for the tokens its mask covers (`EditRow`), taking
everything else from the cache, and `masks.composite` restores the template's pixels outside
the mask after decoding.
"""
