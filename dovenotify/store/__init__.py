"""dovenotify.store"""
