"""Data: archives and folders -> uint8 tensors -> batched augmentation on the device.

`cifar` (archives, safe unpickling), `download`, `folders` (your images), `digits` (the
shipped real digits), `dataset` (ImageData), `load` (every data set by name), `splits`
(validation split, normalization statistics), `images` (the one preprocessing path of
prediction and serving), `augment` and the modern recipe's `crop`, `randaugment`,
`mixing`, `erasing`. Nothing is imported here, so `eanet.data.images` stays lean.
"""
