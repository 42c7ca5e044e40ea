"""One plain function per command of ``mmpretrain <command>``: a composed config in, a result out.

``cli`` wraps each in Hydra; tests call them directly. May import anything of ours but ``cli``.
"""
