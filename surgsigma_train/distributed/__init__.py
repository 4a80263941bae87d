"""Multi-process training: process group and timeouts (env), preemption flag, one engine per backend."""
