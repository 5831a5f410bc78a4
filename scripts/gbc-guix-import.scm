;; Run by gbc-guix-import (see there): the signed export stream on stdin into the store.
(use-modules (guix nar))
(restore-file-set (current-input-port) #:lock? #f)
