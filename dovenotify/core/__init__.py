"""dovenotify.core"""
