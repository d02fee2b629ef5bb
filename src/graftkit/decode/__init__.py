"""Decode-time methods: generation token by token from one model or a combination of models
(EFT up-scaling, :mod:`.eft`). They change no weights."""
from .eft import EftError, EftModels, check_same_tokenizer, combine, eft_decode, plain_decode
from .loop import Decoded, Sampling, Stream, decode

__all__ = ["Decoded", "EftError", "EftModels", "Sampling", "Stream", "check_same_tokenizer", "combine", "decode",
           "eft_decode", "plain_decode"]
