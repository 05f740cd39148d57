#include <stdio.h>
#include <unistd.h>
#ifdef HAVE_CONFIG_H
#include "config.h"
#else
#define GREETING "hello from a cell"
#endif

int main(void) {
    char host[64] = "";
    gethostname(host, sizeof host);
    printf("%s: uid %d on host '%s'\n", GREETING, (int)getuid(), host);
    return 0;
}
