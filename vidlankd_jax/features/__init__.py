"""Raw video -> the per-second 2D (ResNet-152) and 3D (ResNeXt-101) features the teacher reads.

streams.py  what the reference extractor does per stream (frame rate, size, crop, normalisation)
decode.py   PyAV decoding through FFmpeg's own filters, in worker processes (DecodePool)
extract.py  the job: host share, skip finished, batches over the mesh, atomic .npy, manifest
"""
