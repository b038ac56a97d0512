"""The data layer: image files on disk -> float tensors, with no knowledge of models, diffusion or configs.

Modules (import the one you need; this package imports nothing at import time, so a dependency that runs
``import datasets`` expecting Hugging Face's package gets this light, empty module instead of a heavy one):

- ``datasets.images``    open any image mode or ``.npy`` array as an RGB float tensor; clear errors for bad files
- ``datasets.folder``    the ``root/<split>/<class>/<files>`` layout, file lists, deterministic caps, a torch Dataset
- ``datasets.registry``  the named domains (the paper's six, a generic folder, digits for the offline demo)
- ``datasets.celebahq``  build the serious/smiling folders from CelebA-HQ's attribute file
- ``datasets.digits``    write scikit-learn's 8x8 digits as a small folder dataset
"""
