#include <stdio.h>
#include <unistd.h>

int main(void) {
    char host[64] = "";
    gethostname(host, sizeof host);
    printf("hello from a cell: uid %d on host '%s'\n", (int)getuid(), host);
    return 0;
}
