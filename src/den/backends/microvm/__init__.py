"""The microVM backend: QEMU microvm guests with den's kernel, initramfs and agent."""
